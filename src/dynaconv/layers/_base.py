"""The layer contract shared by every dynaconv family.

Every layer in :mod:`dynaconv.layers` is a drop-in for :class:`torch.nn.Conv2d`:

* **Constructor.** ``(in_channels, out_channels, kernel_size, stride=1, padding=0,
  dilation=1, groups=1, bias=True, padding_mode="zeros", device=None, dtype=None)`` exactly as
  ``nn.Conv2d`` (``padding`` may be ``"same"`` or ``"valid"``), followed by the method's own
  keyword options. The signature is written once, in :class:`dynaconv.spec.ConvSpec`; a family adds its
  options through the ``_init_family`` hook (see the class). An invalid combination raises
  :class:`ValueError` naming the argument and the rule; nothing is silently degenerate.
  ``padding="same"`` is also accepted at stride > 1,
  where ``nn.Conv2d`` refuses it: it then means TensorFlow's SAME padding (output
  ``ceil(n / stride)``, asymmetric padding computed from the input size, see
  :mod:`dynaconv.padding`).
* **forward(x)** takes ``(B, Cin, H, W)`` and returns one tensor ``(B, Cout, H', W')`` with
  ``H'``/``W'`` as ``nn.Conv2d`` computes them.
* **.weight** is the effective kernel ``(Cout, Cin/groups, kh, kw)`` where the method has one
  static kernel (DO-Conv, DGConv, LGC); dynamic methods document what it is.
* **aux_loss()** returns the method's regulariser as docs/methods.md defines it (a zero tensor when
  the method has none). :func:`dynaconv.aux_loss` sums it over a model.
* **set_progress(p)** brings the layer's schedule to training progress ``p`` in ``[0, 1]``. All
  schedule state lives in buffers, so it is saved, loaded and identical on every DDP rank. A
  forward pass never changes schedule state, and no Python attribute mirrors it: every path
  reads the buffers, so loading, ``functional_call`` and in-place writes take effect at once.
  Parameters that hold learned structure rather than weights (DGConv's gates) are named in
  the class attribute ``structural_parameters``: an EMA copies them instead of averaging.
* **deploy()** returns the static inference module (exact); :func:`dynaconv.deploy` converts
  and verifies a whole model.
* **from_conv(conv, **options)** builds the layer from an existing ``nn.Conv2d`` (used by
  :func:`dynaconv.convert`), keeping its weights where the method allows, or raises
  :class:`ConversionSkipped` saying why the conv cannot be converted. The checks common to
  every family are written once in :meth:`DynaConv2d.from_conv`; a family adds its own and
  copies the weights through the ``_conversion`` and ``_copy_conv`` hooks.
* **count_macs(input_shape, output_shape, convention="dense")** returns a :class:`MacCount`
  ``(dense, active)`` and **count_params(convention="dense")** the parameters, for
  :func:`dynaconv.profile` (see that function for the conventions, ``"dense"`` and
  ``"reference"``).
* **impl** (families with several exact execution forms): the family declares its forms in a
  :class:`Forms` (class attribute ``forms``), and :class:`ChoosesForm` (a base of
  :class:`DynaConv2d`, used by the deployed modules too) is the one place that picks the form
  of a call; see there.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, NamedTuple, Self

import torch
from torch import Tensor, nn

from ..dispatch import (
    IMPLS,
    choice_timer,
    measure_after,
    measured_choices,
    measuring_enabled,
    memo_token,
    recheck_after,
    resolve_impl,
    tracing,
    triton_preferred,
    triton_unusable_reason,
)
from ..spec import LAYER_ARGUMENTS, ClassSignature, ConvSpec

#: Forms measured within this factor of the chosen one are measured again after the key's
#: next calls (:func:`dynaconv.dispatch.set_measuring`'s ``recheck``).
RECHECK_WITHIN = 1.5

__all__ = [
    "ChoosesForm",
    "Convention",
    "ConversionSkipped",
    "Deployable",
    "DynaConv2d",
    "Form",
    "FormCall",
    "Forms",
    "MacCount",
    "Shape",
]

#: The counting conventions of :func:`dynaconv.profile`.
Convention = Literal["dense", "reference"]
#: A tensor shape, as ``count_macs`` receives it.
Shape = Sequence[int]


class MacCount(NamedTuple):
    """What one call of a module costs, as ``count_macs`` reports it to :func:`dynaconv.profile`.

    ``dense``: multiply-accumulates of the dense computation the module stands for; ``active``:
    those it really has to compute (see :func:`dynaconv.profile` for both conventions; the
    reference convention can count fractions).
    """

    dense: int | float
    active: int | float


class ConversionSkipped(Exception):
    """Raised by ``from_conv`` when a conv cannot become a layer of the family (with why)."""


class Deployable:
    """Marker for modules that :func:`dynaconv.deploy` replaces by ``module.deploy()``.

    Layers and networks that need a model-level rewrite at deployment (for example folding
    channel permutations into neighbouring layers) inherit it and implement ``deploy()``.
    """

    def deploy(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError


def tensor_version(t: Tensor) -> int:
    """``t``'s in-place version counter (what a derived cache compares); 0 for an inference
    tensor, made under ``torch.inference_mode``, which keeps no counter (and cannot be
    written in place outside it)."""
    return 0 if t.is_inference() else t._version


def kaiming_uniform_(weight: Tensor, fan_in: int) -> None:
    """``nn.Conv2d``'s default init (kaiming-uniform with a = sqrt 5) for a given fan-in."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    # kaiming_uniform_(a=sqrt(5)) gives bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class FormCall(NamedTuple):
    """What the choice of a form may depend on besides the module: the call's input and mode.

    ``needs_grad``: autograd will differentiate this call (grad mode on and a parameter, the
    input or an argument requires grad). ``train``: a training step, ``needs_grad`` in
    training mode; measured as forward and backward. Otherwise (inference, also an eval-mode
    forward with gradients) the forward alone is measured, so an eval-mode layer and its
    deployed copy look up one measurement. ``autocast``: autocast is on for the input's
    device (forms may compute, or refuse to compute, differently under it).
    """

    x: Tensor
    needs_grad: bool
    train: bool
    autocast: bool = False


def autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (the :class:`FormCall` field)."""
    kind = x.device.type
    return kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)


@dataclass(frozen=True)
class Form:
    """One exact way to compute a family's output, as the family declares it.

    * ``run(module, x, *args) -> Tensor``: the computation (``args``: what the module's forward
      passes on besides the input, e.g. DGC's saliencies). It must not change the module's
      state: ``impl="auto"`` runs it a few times to time it.
    * ``triton``: a Triton kernel. It runs only where :func:`dynaconv.dispatch.triton_usable`
      says so (an explicit ``impl`` elsewhere is a ``ValueError`` saying why, never a silent
      fallback); ``"torch"`` never picks it, ``"auto"`` only on CUDA.
    * ``batch_dependent``: its work depends on the batch size (a Python loop over examples,
      conv groups per example, a kernel grid over the batch): an empty batch runs another form.
    * ``traceable``: it may run in a traced, compiled or exported graph (plain ops, no host
      read of a tensor, nothing specialised on the batch); elsewhere the export form runs there.
    * ``refuses(module, call) -> str | None``: why the form cannot run this call (None: it
      can). An explicit ``impl`` raises ``ValueError`` with the reason; ``"auto"`` skips it.
    * ``candidate(module, call) -> bool``: whether ``"auto"`` measures the form for this call
      (default: whenever it can run). For forms known to be far off somewhere, whose calls
      there would make measuring itself costly (CondConv's per-example loop at large batches).
    """

    run: Callable[..., Tensor]
    triton: bool = False
    batch_dependent: bool = False
    traceable: bool = True
    refuses: Callable[[Any, FormCall], str | None] | None = None
    candidate: Callable[[Any, FormCall], bool] | None = None


@dataclass(frozen=True)
class Forms:
    """A family's execution forms: the declaration :class:`ChoosesForm` reads.

    * ``forms``: ``{name: Form}``, names from the vocabulary :data:`dynaconv.dispatch.IMPLS`
      (``"torch"`` for a family's only PyTorch form);
    * ``rule(module, call) -> Sequence[str]``: the forms in order of preference for a call,
      used only where measuring is switched off or impossible; the first that can run is
      taken (any form it leaves out comes after, in declaration order);
    * ``export(module, x) -> str``: the (traceable) form a traced, compiled or exported graph
      runs;
    * ``key(module, x, *args) -> Hashable``: the module's configuration as far as the forms'
      speeds depend on it (default: ``module.spec``), part of the measured choice's key.

    ``impls``: the names ``impl`` accepts (``"auto"``, ``"torch"``, then the forms).
    """

    forms: Mapping[str, Form]
    rule: Callable[[Any, FormCall], Sequence[str]]
    export: Callable[[Any, Tensor], str]
    key: Callable[..., Hashable] | None = None
    impls: tuple[str, ...] = field(init=False)
    #: The candidates per configuration, device, dtype and mode (a cache of
    #: :meth:`ChoosesForm.form_candidates`, which the per-call choice reads).
    candidates: dict[Hashable, tuple[str, ...]] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        unknown = [name for name in self.forms if name not in IMPLS or name == "auto"]
        if unknown or not self.forms:
            raise ValueError(
                f"forms must be named from dynaconv.dispatch.IMPLS (not 'auto'), got {unknown}"
            )
        policies = ("auto",) if "torch" in self.forms else ("auto", "torch")
        object.__setattr__(self, "forms", MappingProxyType(dict(self.forms)))
        object.__setattr__(self, "impls", (*policies, *self.forms))

    def resolve(self, impl: Any, argument: str = "impl") -> str:
        """The canonical name of ``impl`` (an alias accepted), or ``ValueError`` listing
        :attr:`impls`."""
        return resolve_impl(impl, self.impls, argument)

    def __getitem__(self, name: str) -> Form:
        return self.forms[name]

    def __iter__(self) -> Iterator[str]:
        """The forms' names, in declaration order."""
        return iter(self.forms)

    def __contains__(self, name: object) -> bool:
        return name in self.forms


class ChoosesForm:
    """The one sequence that picks a module's execution form for a call (a mixin).

    Base of :class:`DynaConv2d` and of the deployed modules with several forms; the module's
    class declares them as ``forms`` (a :class:`Forms`), and its forward calls
    :meth:`run_form`. For a call on ``x``:

    1. traced, compiled or exported: ``impl`` when it names a traceable form, else the
       family's export form;
    2. ``impl`` naming a form: that form (``ValueError`` saying why where it cannot run, e.g. a
       Triton kernel without CUDA); on an empty batch a batch-dependent form is replaced by
       another (they all give the same empty output);
    3. ``"auto"`` (``"torch"``: the same without Triton forms): among the forms that can run
       the call, the fastest measured (:meth:`measured_form`) while measuring is on
       (:func:`dynaconv.dispatch.measuring_enabled`), else the family's rule. A key's first
       calls (:func:`dynaconv.dispatch.measure_after`, 2 by default) run the rule; the next
       one measures, so shapes met once or twice never pay for measuring. Where other forms
       measured within ``RECHECK_WITHIN`` (1.5x) of the chosen one, they are measured again
       after the key's next calls (:func:`dynaconv.dispatch.recheck_after`, 8 by default),
       once the process has settled, and that choice is final.

    ``impl`` is validated and canonicalised once, when set.
    """

    forms: ClassVar[Forms | None] = None

    @property
    def impl(self) -> str:
        """The execution form: ``"auto"``, ``"torch"`` or a form's name (canonical)."""
        if self.forms is None:
            raise AttributeError(f"{type(self).__name__} has a single execution form (no impl)")
        impl = self.__dict__.get("_impl")
        if impl is None:  # a module pickled before impl was a property kept it as "impl"
            impl = self.__dict__["_impl"] = self.forms.resolve(self.__dict__.get("impl", "auto"))
        return impl

    @impl.setter
    def impl(self, value: Any) -> None:
        if self.forms is None:
            raise AttributeError(f"{type(self).__name__} has a single execution form (no impl)")
        self.__dict__["_impl"] = self.forms.resolve(value)

    def form_call(self, x: Tensor, *args: Any) -> FormCall:
        """The :class:`FormCall` of a forward on ``x`` (and the forward's ``args``)."""
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or any(isinstance(a, Tensor) and a.requires_grad for a in args)
            or any(p.requires_grad for p in self.parameters())  # type: ignore[attr-defined]
        )
        train = needs_grad and self.training  # type: ignore[attr-defined]
        return FormCall(x, needs_grad, train, autocast_on(x))

    def run_form(self, x: Tensor, *args: Any) -> Tensor:
        """The module's output on ``x`` computed by the form :meth:`choose_form` picks."""
        return self.forms[self.choose_form(x, *args)].run(self, x, *args)  # type: ignore[index]

    def choose_form(self, x: Tensor, *args: Any) -> str:
        """The form a forward on ``x`` runs (the sequence of the class docstring)."""
        forms = self.forms
        if forms is None:
            raise AttributeError(f"{type(self).__name__} has a single execution form (no impl)")
        impl = self.impl
        if tracing():
            form = forms.forms.get(impl)
            return impl if form is not None and form.traceable else forms.export(self, x)
        return self._choose(impl, self.form_call(x, *args), args)

    def inference_form(self, x: Tensor, *args: Any) -> str:
        """The form an inference forward on ``x`` runs (eval mode or no gradient): what the
        deployed copy of the layer runs on ``x`` too."""
        with torch.no_grad():
            return self._choose(self.impl, FormCall(x, False, False, autocast_on(x)), args)

    def _choose(self, impl: str, call: FormCall, args: tuple[Any, ...]) -> str:
        forms = self.forms
        assert forms is not None
        x = call.x
        form = forms.forms.get(impl)
        if form is not None and not (form.batch_dependent and x.shape[0] == 0):
            why = self._refusal(form, call)
            if why is not None:
                raise ValueError(f"impl={impl!r} cannot run this call: {why}")
            return impl
        config = self.spec if forms.key is None else forms.key(self, x, *args)  # type: ignore[attr-defined]
        # The memo of the last choice: a layer's calls repeat one signature (the training
        # steps, then the evaluation batches), and a final choice for it (measured, or the
        # rule with measuring off) stands until the shared cache is cleared or measuring is
        # switched (the token). Compared by equality, without hashing the configuration.
        signature = (impl, config, x.shape, x.stride(), x.dtype, x.device, *call[1:])
        token = memo_token()
        deterministic = torch._C._get_deterministic_algorithms()
        memo = self.__dict__.get("_form_memo")
        if (
            memo is not None
            and memo[0] is token
            and memo[1] == deterministic
            and memo[2] == signature
        ):
            return memo[3]
        chosen, final = self._choose_among_candidates(impl, call, args, config)
        if final:
            self.__dict__["_form_memo"] = (token, deterministic, signature, chosen)
        return chosen

    def _choose_among_candidates(
        self, impl: str, call: FormCall, args: tuple[Any, ...], config: Hashable
    ) -> tuple[str, bool]:
        """The form ``"auto"`` (or ``"torch"``) runs for ``call``, and whether that choice is
        final for the call's signature (measured, or the rule with measuring off; not the
        rule of a key's first calls)."""
        forms = self.forms
        assert forms is not None
        x = call.x
        empty = x.shape[0] == 0
        known = (
            type(self),
            config,
            x.shape[0],
            x.device,
            x.dtype,
            call.needs_grad,
            call.train,
            call.autocast,
            impl,
        )
        candidates = forms.candidates.get(known)
        if candidates is None:
            candidates = tuple(self.form_candidates(call, triton=impl == "auto"))
            forms.candidates[known] = candidates
        if not candidates:
            raise ValueError(
                f"no execution form of {type(self).__name__} can run this call "
                f"(impl={impl!r}, input {tuple(x.shape)} {x.dtype} on {x.device})"
            )
        if len(candidates) > 1 and not empty and measuring_enabled():
            key = self.form_key(call, candidates, config)
            chosen = measured_choices.get(key)
            if chosen is not None:
                if not measured_choices.provisional(key) or recheck_after() == 0:
                    return chosen, True
                if measured_choices.seen(key) < recheck_after():
                    return chosen, False
                return self._rechecked_form(call, args, key), True
            if measured_choices.seen(key) >= measure_after():
                chosen = self.measured_form(call, candidates, args)
                return chosen, key in measured_choices and not measured_choices.provisional(key)
            return self.ruled_form(call, candidates), False
        return self.ruled_form(call, candidates), True

    def _refusal(self, form: Form, call: FormCall) -> str | None:
        if form.triton:
            why = triton_unusable_reason(call.x)
            if why is not None:
                return why
        return None if form.refuses is None else form.refuses(self, call)

    def form_candidates(self, call: FormCall, triton: bool = True) -> list[str]:
        """The forms ``impl="auto"`` chooses from for ``call`` (``triton=False``: ``"torch"``):
        those that can run it and are candidates (:class:`Form`); Triton forms only on CUDA;
        batch-independent ones for an empty batch."""
        empty = call.x.shape[0] == 0
        names = []
        for name, form in self.forms.forms.items():  # type: ignore[union-attr]
            if form.triton and not (triton and triton_preferred(call.x)):
                continue
            if (empty and form.batch_dependent) or self._refusal(form, call) is not None:
                continue
            if form.candidate is not None and not form.candidate(self, call):
                continue
            names.append(name)
        return names

    def ruled_form(self, call: FormCall, candidates: Sequence[str]) -> str:
        """The family's rule's preference among ``candidates`` (the choice without measuring)."""
        for name in self.forms.rule(self, call):  # type: ignore[union-attr]
            if name in candidates:
                return name
        return candidates[0]

    def form_key(self, call: FormCall, candidates: Sequence[str], config: Hashable) -> Hashable:
        """The key of the measured choice: the module's class and configuration (``config``,
        see :class:`Forms`), the input's shape, strides, dtype and device, the mode (training
        step or inference), whether autocast is on and the candidates."""
        x = call.x
        return (
            type(self).__qualname__,
            config,
            tuple(x.shape),
            x.stride(),
            x.dtype,
            x.device,
            call.train,
            call.autocast,
            tuple(candidates),
        )

    def measured_form(
        self, call: FormCall, candidates: Sequence[str], args: tuple[Any, ...]
    ) -> str:
        """The fastest of ``candidates`` for this call, measured once per key
        (:meth:`form_key`) and kept in :data:`dynaconv.dispatch.measured_choices`.

        Each candidate runs a few times (:meth:`MeasuredChoices.choose`, timed by
        :func:`dynaconv.dispatch.choice_timer`: CUDA events, or on the CPU the thread's CPU
        time with one torch thread and the wall clock with more); inference calls time
        the forward (under the call's grad mode, outputs discarded), training steps the
        forward and backward on detached copies of the input and arguments, the gradients
        taken by ``torch.autograd.grad`` (nothing accumulates in ``.grad``). The random
        number generators are restored afterwards, so measuring changes no result or state.
        """
        forms = self.forms
        assert forms is not None
        x = call.x
        config = self.spec if forms.key is None else forms.key(self, x, *args)  # type: ignore[attr-defined]
        key = self.form_key(call, candidates, config)
        chosen = measured_choices.get(key)
        if chosen is not None:
            return chosen
        ruled = self.ruled_form(call, candidates)
        ordered = [ruled, *(name for name in candidates if name != ruled)]  # likeliest first
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            return measured_choices.choose(
                key,
                ordered,
                self._timed_run(call, args),
                timer=choice_timer(x.device),
                label=type(self).__name__,
                fallback=ruled,
                recheck_within=RECHECK_WITHIN if recheck_after() else None,
            )

    def _rechecked_form(self, call: FormCall, args: tuple[Any, ...], key: Hashable) -> str:
        """The provisional choice for ``key`` measured again among its contenders
        (:meth:`MeasuredChoices.recheck`), now final; as :meth:`measured_form` measures."""
        x = call.x
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            return measured_choices.recheck(
                key,
                self._timed_run(call, args),
                timer=choice_timer(x.device),
                label=type(self).__name__,
            )

    def _timed_run(self, call: FormCall, args: tuple[Any, ...]) -> Callable[[str], None]:
        forms = self.forms
        assert forms is not None
        if not call.train:

            def forward(name: str) -> None:
                forms.forms[name].run(self, call.x, *args)

            return forward

        def leaf(value: Any) -> Any:
            if isinstance(value, Tensor) and value.requires_grad:
                return value.detach().requires_grad_()
            return value

        x, copies = leaf(call.x), tuple(leaf(a) for a in args)
        inputs = [t for t in (x, *copies) if isinstance(t, Tensor) and t.requires_grad]
        inputs += [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]

        def step(name: str) -> None:
            out = forms.forms[name].run(self, x, *copies)
            torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

        return step


def _family_signature(owner: type) -> inspect.Signature:
    """``inspect.signature`` of a family's class: ``nn.Conv2d``'s arguments
    (:data:`dynaconv.spec.LAYER_ARGUMENTS`), then the family's options (the keyword-only
    parameters of ``cls._init_family``); a class with its own ``__init__`` shows that one's."""
    if owner.__init__ is not DynaConv2d.__init__:  # type: ignore[misc]
        raise AttributeError("__signature__")
    hook = inspect.signature(owner._init_family).parameters.values()  # type: ignore[attr-defined]
    options = [p for p in hook if p.kind is p.KEYWORD_ONLY]
    return inspect.Signature([*LAYER_ARGUMENTS.parameters.values(), *options])


class DynaConv2d(ChoosesForm, Deployable, nn.Module):
    """Base class of every dynaconv layer; see the module docstring for the contract.

    The ``nn.Conv2d`` arguments are taken and validated here (into :attr:`spec`, a
    :class:`ConvSpec`); a family adds its own through two hooks:

    * ``_init_family(self, device, dtype, *, option=default, ...)`` builds the family's
      parameters and buffers once ``self.spec`` exists. Its keyword-only parameters are the
      family's options: the constructor passes them on, and ``inspect.signature`` of the class
      shows them after ``nn.Conv2d``'s arguments.
    * ``_conversion(cls, conv, *, option=default, ...) -> dict`` (classmethod) checks whether
      ``conv`` converts with these options (:class:`ConversionSkipped` saying why not) and
      returns the constructor's options; ``_copy_conv(self, conv, options)`` then copies
      ``conv``'s weights into the new layer (``options``: the conversion options, defaults
      applied). :meth:`from_conv` does the rest, the same for every family.

    A family with several exact execution forms declares them in the class attribute ``forms``
    (a :class:`Forms`) and calls :meth:`run_form` from its forward: :class:`ChoosesForm` (a
    base of this class) holds the one selection sequence and the ``impl`` property.

    Class attributes: ``method`` (set by :func:`dynaconv.families.register_family`),
    ``title`` (the family's name in messages) and ``conv_groups``, how :meth:`from_conv` treats a
    grouped conv: ``"keep"`` (the layer has the conv's groups), ``"one"`` (only ``groups=1``
    convs convert) or ``"learn"`` (any conv converts; the layer has ``groups=1`` and learns its
    own). The family's facts that tools and the generic tests read:

    * ``example_options``: conversion options that turn a small network's convs into
      working layers (``python -m dynaconv demo`` and the generic tests use them);
    * ``example_aux_loss_weight``: a weight of :meth:`aux_loss` in a training loss that works
      with them (the demo's);
    * ``static_kernel``: ``.weight`` is the layer's one static kernel;
    * ``deploys_to_itself``: there is no static equivalent, :meth:`deploy` returns an eval-mode
      layer of the family (e.g. CondConv, whose kernel depends on the input).

    The learned structure is drawn from :meth:`structure_maps` (one hook, one plotter).
    """

    method: ClassVar[str] = ""
    title: ClassVar[str] = ""
    conv_groups: ClassVar[Literal["keep", "one", "learn"]] = "keep"
    example_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    example_aux_loss_weight: ClassVar[float] = 0.0
    static_kernel: ClassVar[bool] = False
    deploys_to_itself: ClassVar[bool] = False
    __signature__ = ClassSignature(_family_signature)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Conv2d``'s arguments (:data:`dynaconv.spec.LAYER_ARGUMENTS`), then the family's
        keyword options (see the class)."""
        super().__init__()
        conv = {name: kwargs.pop(name) for name in LAYER_ARGUMENTS.parameters if name in kwargs}
        arguments = LAYER_ARGUMENTS.bind(*args, **conv).arguments
        device, dtype = arguments.pop("device", None), arguments.pop("dtype", None)
        self.spec = ConvSpec.create(**arguments)
        self._init_family(device, dtype, **kwargs)

    def _init_family(self, device: Any, dtype: Any) -> None:
        """The family's parameters and buffers (see the class); none by default."""

    # nn.Conv2d-compatible attributes, so code that inspects convs keeps working.
    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.spec.kernel_size

    @property
    def stride(self) -> tuple[int, int]:
        return self.spec.stride

    @property
    def padding(self) -> tuple[int, int] | str:
        return self.spec.padding

    @property
    def dilation(self) -> tuple[int, int]:
        return self.spec.dilation

    @property
    def groups(self) -> int:
        return self.spec.groups

    @property
    def padding_mode(self) -> str:
        return self.spec.padding_mode

    # The contract's defaults.
    def aux_loss(self) -> Tensor:
        ref = next(self.parameters(), None)
        return torch.zeros(
            (), device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype
        )

    def set_progress(self, progress: float) -> None:
        """Bring the schedule to ``progress``; families without a schedule ignore it."""
        check_progress(progress)

    def deploy(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no deploy()")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> Self:
        """The layer of this family built from ``conv`` (used by :func:`dynaconv.convert`).

        ``options`` are the family's conversion options (the keyword-only parameters of its
        ``_conversion``, see :meth:`conversion_options`); any other raises ``ValueError``.
        Only a plain ``nn.Conv2d`` converts (a subclass such as ``SameConv2d`` computes
        something else), a grouped one only where the family allows (``conv_groups``); else
        :class:`ConversionSkipped` says why. The layer gets ``conv``'s geometry (padding mode
        included), device, dtype and training flag, and its weights where the family allows.
        """
        if cls._copy_conv is DynaConv2d._copy_conv:
            raise NotImplementedError(f"{cls.__name__} cannot be built from nn.Conv2d")
        unknown = sorted(set(options) - set(cls.conversion_options()))
        if unknown:
            raise ValueError(f"unknown {cls.title or cls.__name__} option(s): {unknown}")
        if type(conv) is not nn.Conv2d:
            raise ConversionSkipped(f"{type(conv).__name__} is not a plain nn.Conv2d")
        if conv.groups != 1 and cls.conv_groups == "one":
            raise ConversionSkipped(
                f"grouped conv (groups={conv.groups}); {cls.title or cls.__name__} needs groups=1"
            )
        bound = inspect.signature(cls._conversion).bind(conv, **options)
        bound.apply_defaults()
        options = {k: v for k, v in bound.arguments.items() if k != "conv"}
        layer_options = cls._conversion(conv, **options)
        kwargs = ConvSpec.from_conv(conv).conv_kwargs()
        if cls.conv_groups == "learn":
            kwargs["groups"] = 1
        layer = cls(**kwargs, device=conv.weight.device, dtype=conv.weight.dtype, **layer_options)
        with torch.no_grad():
            layer._copy_conv(conv, options)
        layer.train(conv.training)
        return layer

    @classmethod
    def conversion_options(cls) -> tuple[str, ...]:
        """The names of the options :meth:`from_conv` takes."""
        parameters = inspect.signature(cls._conversion).parameters.values()
        return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)

    @classmethod
    def _conversion(cls, conv: nn.Conv2d) -> dict[str, Any]:
        """Check that ``conv`` converts with the given options (:class:`ConversionSkipped`
        otherwise) and return the constructor's options (see the class)."""
        return {}

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        """Copy ``conv``'s weights into this new layer (runs without autograd)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be built from nn.Conv2d")

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        """The layer's :class:`MacCount`: by default the ``nn.Conv2d`` it stands for, in both
        conventions (see :func:`dynaconv.profile`)."""
        dense = self.spec.dense_macs(output_shape)
        return MacCount(dense, dense)

    def count_params(self, convention: Convention = "dense") -> int:
        """The parameters :func:`dynaconv.profile` counts: by default the stored ones."""
        return sum(p.numel() for p in self.parameters())

    def structure(self) -> str:
        """A short human-readable description of the learned structure (for tables)."""
        return ""

    def structure_maps(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The learned structure as named maps, for the structure plot of a run.

        ``outputs``: what the layer's sub-modules returned on a validation batch
        (``{sub_module_name: tensor}``, possibly empty). A map is a 0-d tensor (one value per
        layer, drawn as bars over the layers), a 1-d tensor (a row per layer, drawn as a
        heat map) or a 2-d tensor (an image per layer). By default: every 0/1-valued buffer
        or parameter of at least two dimensions (masks), as ``(rows, columns)`` images.
        """
        maps = {}
        named = [*self.named_buffers(recurse=False), *self.named_parameters(recurse=False)]
        for name, value in named:
            if value is None or value.numel() < 2 or value.dim() < 2:
                continue
            data = value.detach().float().cpu()
            if bool(((data == 0) | (data == 1)).all()):
                maps[name] = data.reshape(data.shape[0], -1)
        return maps

    def extra_repr(self) -> str:
        s = self.spec
        parts = [
            f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, stride={s.stride}"
        ]
        if s.padding != (0, 0):
            parts.append(f"padding={s.padding}")
        if s.dilation != (1, 1):
            parts.append(f"dilation={s.dilation}")
        if s.groups != 1:
            parts.append(f"groups={s.groups}")
        if not s.bias:
            parts.append("bias=False")
        if s.padding_mode != "zeros":
            parts.append(f"padding_mode={s.padding_mode!r}")
        return ", ".join(parts)


def check_progress(progress: float) -> float:
    """``progress`` as a float, or ValueError unless it is a real number in ``[0, 1]``."""
    if (
        isinstance(progress, bool)
        or not isinstance(progress, numbers.Real)
        or not 0.0 <= progress <= 1.0
    ):
        raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
    return float(progress)
