"""Rewrite an existing model's Linear -> [BatchNorm1d ->] activation [-> Dropout]
runs into fastgan's fused layers, and back.

``fuse(model)`` finds runs in two places:

* ``nn.Sequential`` containers (nested ones too, and the flat ones GAN code
  builds with ``nn.Sequential(*block(...), *block(...))``): the run's children
  are wrapped, unchanged, in a ``LinearBNAct`` / ``LinearAct`` that takes the
  place of the run's first child (``sequential``).
* Modules whose ``forward`` calls ``self.fc(x)`` then a functional activation
  (any function or Tensor method of a row of
  ``fastgan.ops.spec.ACTIVATION_TABLE``) and ``F.dropout``: the forward is
  traced with ``torch.fx`` (each child module is a leaf, so only the module's
  own code is read) and the run's nodes become one call of the fused layer
  (``fx_match`` finds the runs, ``fx_pass`` rewrites). The module keeps its
  class (its new class is a subclass with the generated forward, ``fx_class``),
  attributes and methods; Python values its forward read (``self.p``) are
  frozen at trace time, as with any fx graph. A forward that fx cannot trace,
  or whose graph depends on ``self.training`` beyond dropout, is left alone
  and reported.

Whether a run can fuse is decided in ``checks``; what was done is told in a
``FuseReport`` (``report``). Weights are never copied: the fused layer holds
the very same Linear and BatchNorm1d modules (``wrap``; on ``fuse``'s deep
copy unless ``inplace=True``), so device, dtype, eps, momentum, mode and
running statistics carry over exactly.

State-dict keys do not change. A fused layer keeps its children under
``0``, ``1``...; a state-dict hook on its parent renames them back to the
original names (``model.3.weight``, ``fc1.weight``, ``bn1.running_var``) and a
load pre-hook maps them in, so checkpoints load both ways (``keys``).
``unfuse`` puts the original children back where they were and removes the
hooks (``undo``).
"""
from .driver import fuse
from .report import FusedRun, FuseReport, LeftAlone
from .undo import unfuse

# Fused models pickled before fuse became a package hold these functions under
# these names (fastgan.nn.fuse._rebuild_fx, or fastgan.fuse._rebuild_fx through
# the alias); they stay here so such pickles keep loading.
from .fx_class import rebuild_fx as _rebuild_fx  # noqa: F401
from .keys import load_pre_hook as _load_pre_hook  # noqa: F401
from .keys import state_dict_hook as _state_dict_hook  # noqa: F401

__all__ = ["fuse", "unfuse", "FuseReport", "FusedRun", "LeftAlone"]
