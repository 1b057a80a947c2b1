"""Exponential moving average of a model that copies, rather than averages, structure.

``ema = decay * ema + (1 - decay) * model`` for parameters and for the floating-point buffers
that are statistics (BatchNorm's running mean and variance). **Structural state is copied**
from the model at every update (and, when the EMA is updated only every ``train.ema_every``
iterations, at every iteration in between: :meth:`ModelEMA.copy_structure`), because an average of two masks, gate states or counters is
not a mask, a gate state or a counter: the EMA's learned structure (``structure()``, groups,
masks, stages, kept-channel counts) is always the model's.

A parameter is structural when its owning module lists its name in a ``structural_parameters``
attribute: DGConv's ``gate`` (:class:`~dynaconv.layers.dgconv.GroupableConv2d`), whose signs
are the learned groups (averaging them lags the model's structure by many steps: an EMA had 4
groups where the model had 2). A buffer is structural when

1. it is not floating point (boolean masks, integer counters and indices,
   ``num_batches_tracked``); or
2. it belongs directly to a dynaconv layer (a :class:`~dynaconv.layers.DynaConv2d`), whose
   buffers hold schedule and learned-structure state by the layer contract (floating masks
   such as LGC's included); buffers of sub-modules inside a layer (e.g. a BatchNorm inside a
   DGC layer) follow the other rules; or
3. its owning module lists its name in a ``structural_buffers`` attribute (any module can opt
   in this way, e.g. ``structural_buffers = ("mask",)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from dynaconv.layers._base import DynaConv2d

__all__ = ["ModelEMA", "structural_buffer_names", "structural_parameter_names"]


def structural_buffer_names(model: nn.Module) -> set[str]:
    """Qualified names of the buffers of ``model`` that the EMA copies (see module docstring)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        declared = set(getattr(module, "structural_buffers", ()) or ())
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is None:
                continue
            if (
                not buffer.is_floating_point()
                or isinstance(module, DynaConv2d)
                or buffer_name in declared
            ):
                names.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names


def structural_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters of ``model`` that the EMA copies: those each module
    declares in its ``structural_parameters`` attribute (see module docstring)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        declared = set(getattr(module, "structural_parameters", ()) or ())
        for parameter_name, _ in module.named_parameters(recurse=False):
            if parameter_name in declared:
                names.add(f"{module_name}.{parameter_name}" if module_name else parameter_name)
    return names


class ModelEMA:
    """An averaged copy of a model (``.module``), updated by :meth:`update` after each step.

    The averaging is torch's :class:`~torch.optim.swa_utils.AveragedModel` (buffers included)
    with :meth:`_average` as its averaging function: the exponential moving average, except
    for the structural state, which it copies (module docstring). Unlike ``AveragedModel``'s
    default start (the first update copies the model), the average starts from the model as it
    is when the EMA is made, and every update averages. :meth:`state_dict` is the averaged
    module's (the checkpoints' ``ema`` entry, as before ``AveragedModel`` was used).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, avg_fn=self._average, use_buffers=True)
        self.averaged.n_averaged.fill_(1)  # the copy made here is the first average
        self.module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.structural = structural_buffer_names(model)
        self.structural_parameters = structural_parameter_names(model)
        #: Addresses of the averaged module's structural tensors (``AveragedModel`` passes
        #: tensors, not names, to the averaging function); taken at each update, since moving
        #: the module (``.to``) moves them.
        self._copied: set[int] = set()

    @property
    def module(self) -> nn.Module:
        """The averaged model."""
        return self.averaged.module

    def _average(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        """The next value of one averaged tensor: the model's for structural state, else
        ``decay * averaged + (1 - decay) * current``."""
        if averaged.data_ptr() in self._copied or not averaged.is_floating_point():
            return current
        return averaged.lerp(current.to(averaged.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def copy_structure(self, model: nn.Module) -> None:
        """Copy only the structural state (no averaging): called at every iteration on which
        :meth:`update` is not (``train.ema_every > 1``), so the EMA's structure never lags."""
        ema_params = dict(self.module.named_parameters())
        for name, parameter in model.named_parameters():
            if name in self.structural_parameters:
                ema_params[name].copy_(parameter.detach())
        ema_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            if name in self.structural or not buffer.is_floating_point():
                ema_buffers[name].copy_(buffer)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model`` (after an optimiser step)."""
        named = [*self.module.named_parameters(), *self.module.named_buffers()]
        self._copied = {
            tensor.data_ptr()
            for name, tensor in named
            if name in self.structural or name in self.structural_parameters
        }
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
