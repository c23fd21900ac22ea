"""Keep module *attributes* consistent with (re-shaped) parameter tensors.

Another part of the toolkit computes new parameter/buffer tensors whose hidden widths differ from
the original model (usually narrower, sometimes wider) and writes them into a deep copy of the model
with :func:`replace_tensor`.  After that, attributes such as ``nn.Linear.in_features``,
``BatchNorm2d.num_features``, timm ``Attention.num_heads/head_dim/scale`` or a Hugging Face
``config`` still describe the *old* widths.  :func:`sync_module_attributes` walks the model and
re-derives every width-describing attribute from the current tensor shapes;
:func:`check_consistency` reports what is still inconsistent.

Typical use::

    fused = copy.deepcopy(model)
    old_shapes = {n: t.shape for n, t in fused.state_dict(keep_vars=True).items()}
    for name, tensor in new_tensors.items():
        replace_tensor(fused, name, tensor)
    sync_module_attributes(fused, num_heads=None, old_shapes=old_shapes)
    assert not check_consistency(fused)

Extending: a module type that stores widths and is not covered here can be supported with::

    @register_attribute_sync(MyBlock)
    def _sync_my_block(module, path, ctx):
        module.hidden = module.fc1.out_features

Handlers run children-first (a module's descendants are already synced when its handler runs).
``register_attribute_sync`` also accepts the dotted ``"package.module.ClassName"`` of a class, which
avoids importing the package.  Helpers for writing handlers (``out_width``, ``is_tensor``,
``module_check``, ...) are in :mod:`fusion.modules.core`.  The handlers are registered on import, one
file per library: ``torch_modules``, ``timm_modules`` and ``hf_modules`` (transformers); their
docstrings list the covered types and the library attributes they rely on.
"""

from . import hf_modules, timm_modules, torch_modules  # noqa: F401  (registers the handlers)
from .core import (
    AttributeSyncError, AttributeSyncWarning, GroupsNotDivisibleError, HeadsNotDivisibleError, SyncContext, SyncHandler,
    UnknownModuleError, UnknownTensorError, check_consistency, lookup, register_attribute_sync, register_config_sync,
    register_derived_width, register_width_free, replace_tensor, sync_module_attributes, unregister_attribute_sync,
)

__all__ = [
    "AttributeSyncError", "AttributeSyncWarning", "GroupsNotDivisibleError", "HeadsNotDivisibleError", "SyncContext",
    "SyncHandler", "UnknownModuleError", "UnknownTensorError", "check_consistency", "lookup",
    "register_attribute_sync", "register_config_sync", "register_derived_width", "register_width_free", "replace_tensor",
    "sync_module_attributes", "unregister_attribute_sync",
]
