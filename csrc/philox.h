// Philox 4x32-10 dropout RNG shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels. Bit-exact with fastgan/impl/reference.py and Triton's tl.philox/tl.rand:
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (element index i*N+j, offset low 32 bits, offset high 32 bits, 0)
//   u       = uint_to_uniform_float(first output word)      in [0, 1)
//   keep    = u >= float(p);  kept values are scaled by float(1 / (1 - p)).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace fastgan {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
// Largest float with (2^31 - 1) * scale < 1, the constant tl.rand uses.
constexpr float kUintToFloatScale = 4.6566127342e-10f;

FASTGAN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// First output word of Philox4x32-10 for counter (c0, c1, c2, 0), key (k0, k1).
FASTGAN_HD uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t k0,
                                      uint32_t k1) {
  uint32_t c3 = 0;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

FASTGAN_HD float uint_to_uniform_float(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  if (x < 0) x = -x - 1;
  return static_cast<float>(x) * kUintToFloatScale;
}

// The factor kept values are multiplied by: float(1 / (1 - p)), the quotient
// taken in double (fastgan.ops.spec.dropout_scale).
inline float dropout_scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

// The (seed, offset) pair, split into the key and the high counter words once
// per kernel, read from the device tensors so CUDA graph replays see new values.
struct DropoutKey {
  uint32_t k0, k1, c1, c2;
  FASTGAN_HD DropoutKey(int64_t seed, int64_t offset)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        c1(static_cast<uint32_t>(static_cast<uint64_t>(offset))),
        c2(static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32)) {}
  // Uniform float in [0, 1) for element index `idx` of the output.
  FASTGAN_HD float uniform(uint32_t idx) const {
    return uint_to_uniform_float(philox_first_word(idx, c1, c2, k0, k1));
  }
};

}  // namespace fastgan
