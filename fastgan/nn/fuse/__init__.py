"""Run an existing model's Linear -> [BatchNorm1d ->] activation / Dropout runs as
fastgan's fused ops, without changing the model.

``model, report = fuse(model)`` rewrites how runs *execute*, never the module
tree: every module keeps its path, index, class (as ``repr`` and
``isinstance`` see it), Parameter objects, buffers and hooks, so
``named_parameters``, ``state_dict``, ``get_submodule``, indexing and an
optimizer built before ``fuse`` all work unchanged. It finds runs in

* ``nn.Sequential`` containers (nested ones too, and the flat ones GAN code
  builds with ``nn.Sequential(*block(...), *block(...))``) (``sequential``);
* modules whose own ``forward`` calls ``self.fc(x)`` then an activation
  function of ``fastgan.ops.spec.ACTIVATION_TABLE`` and ``F.dropout``, read
  with ``torch.fx`` (``fx_match``, ``fx_pass``).

What a run is: ``checks``. How a planned module runs: ``plan`` (its plan, and
a subclass of its own class whose forward follows it). One run: ``run``
(one fused op over the children's own tensors, or the children themselves
where a hook, a dtype or the speed rule says so: ``hooks``, ``speed``).
What was done: ``report``. ``unfuse`` is exact (``undo``; models fused by an
older fastgan: ``legacy``).
"""
from .driver import fuse
from .report import FusedRun, FuseReport, LeftAlone
from .undo import unfuse

# Fused models pickled by an older fastgan name these functions here
# (fastgan.nn.fuse._rebuild_fx, or fastgan.fuse._rebuild_fx through the alias).
from .legacy import load_pre_hook as _load_pre_hook  # noqa: F401
from .legacy import rebuild_fx as _rebuild_fx  # noqa: F401
from .legacy import state_dict_hook as _state_dict_hook  # noqa: F401

__all__ = ["fuse", "unfuse", "FuseReport", "FusedRun", "LeftAlone"]
