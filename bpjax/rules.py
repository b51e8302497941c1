r"""Feedback rules as values: what matrix (7.2) sends the error down with.

Backpropagation's (7.2), dZ^l = (W^{l+1})^T dZ^{l+1} ⊙ σ'(Z^l), can use another
matrix in place of W^{l+1}; (7.1), (7.3), (7.4) never change. A :class:`Rule` is a
frozen value of pure functions, the way optax's ``GradientTransformation`` is an
optimizer: every built-in rule below is built exactly as a user's own would be,
and nothing in ``formulas``, ``privacy``, ``noise_scale`` or the alignment reads a
rule's name. ``register_rule(rule)`` makes a rule known by its name in this
process; ``--feedback=package.module:name`` names one by import path (the run
records the path and the SHA-256 of the module's source, and a resume refuses a
module that changed unless ``--accept_rule_change``).

A rule's parts (``Rule``'s fields):

* ``matrix(W, state, key) -> B``: the matrix that stands in for W^{l+1}, W's shape;
  (7.2) multiplies B^T (the layer's ``transpose``). ``state`` is this layer's
  feedback state, ``key`` this step's key for the layer (None unless ``needs_key``).
* ``init(key, shape, dtype) -> state``: one layer's feedback state, ``shape`` the
  shape of that layer's W (None: the rule keeps no state).
* ``direct``: (7.2) takes the output error dZ^L itself (dfa), through B^l
  ``(N_l, N_L)`` for each hidden layer l; ``matrix(None, state, key)`` returns it.
* ``needs_key``: ``matrix`` draws from a per-step key (brsf); the training step
  derives it (``step_key``) from its own, so the run stays reproducible from its seed.
* ``learn(grads, params, feedback, decay) -> (param_grads, feedback_grads)``: the
  feedback learns with the weights, one optimizer over the pair (kp).
* ``scalable``: ``--feedback_scale`` may multiply B by s = sqrt(2 / (fan_in + fan_out))
  (``scale`` is then True), BioTorch's ``scaling_factor`` option.

The built-in rules, l = 2..L (the output layer's dW^L is exact under every rule):

    rule  B^l in (7.2)                  state                       reference
    bp    W^l                           none                        backprop
    fa    B^l, fixed                    B^l ~ U(±sqrt(6/(fi+fo)))   Lillicrap et al. 2016
    kp    B^l, learning with W^l        as fa                       Akrout et al. 2019
    dfa   B^l (N_l, N_L) on dZ^L        B^l, l = 1..L-1             Nøkland 2016
    sign  sign(W^l), unscaled           none                        Liao, Leibo & Poggio 2016
    usf   sign(W^l)                     none                        BioTorch ``usf``
    brsf  |R^l| ⊙ sign(W^l), R^l redrawn every step    none         BioTorch ``brsf``
    frsf  |R^l| ⊙ sign(W^l), R^l drawn once            R^l          BioTorch ``frsf``

R^l is Glorot (Xavier) uniform for W^l's shape, as BioTorch draws it; brsf draws it
from the step's key, ``fold_in(key, l)`` per layer. With ``--feedback_scale``, usf,
brsf and frsf multiply B^l by s = sqrt(2 / (fan_in + fan_out)) of W^l (BioTorch's
``scaling_factor``, applied, as there, after the rule's own matrix: for usf this
gives entries ±s, the standard deviation of W's Glorot init; for brsf and frsf,
whose |R| is already Glorot-scaled, B is s times smaller still). ``sign`` is usf
without the option, kept as the documented unscaled form: entries ±1 against
|W| ≈ 0.06 on 784-500-10, so its hidden steps are about 1/|W| larger than bp's and
deep nets diverge; prefer ``--feedback=usf --feedback_scale``.

KP (``learn``): B^l receives W^l's own dW^l and both decay by λ, so under plain SGD
with learning rate η, W^l_t - B^l_t = (1 - ηλ)^t (W^l_0 - B^l_0). Under momentum or
Adam the identity does not hold (the run warns and records it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from bpjax.errors import ConfigError, first_line
from bpjax.layers import glorot_uniform

Array = jax.Array
RULE_KEY_STREAM = 0x7EED  # fold_in(step key, this): the rule's key, apart from DP noise


@dataclasses.dataclass(frozen=True)
class Rule:
    """A feedback rule (module docstring). Frozen and hashable: a ``jax.jit`` static."""

    name: str
    matrix: Callable[[Array | None, Any, Array | None], Array]
    init: Callable[[Array, tuple[int, ...], Any], Any] | None = None
    direct: bool = False
    needs_key: bool = False
    learn: Callable[..., tuple[Any, Any]] | None = None
    scalable: bool = False
    scale: bool = False
    about: str = ""

    def scaled(self) -> Rule:
        """This rule with B times s = sqrt(2 / (fan_in + fan_out)) (``--feedback_scale``)."""
        if not self.scalable:
            raise ConfigError(
                f"--feedback_scale: rule {self.name!r} has no scaled form (usf, brsf, frsf"
                " have; sign is the unscaled usf)"
            )
        return dataclasses.replace(self, scale=True)


def fan_scale(shape: tuple[int, ...]) -> float:
    """s = sqrt(2 / (fan_in + fan_out)) for a W of ``shape`` (out, in, *receptive field)."""
    receptive = math.prod(shape[2:])
    return math.sqrt(2.0 / (shape[1] * receptive + shape[0] * receptive))


def glorot_state(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    """A Glorot-uniform matrix of ``shape`` (fa, kp, dfa's B; frsf's R)."""
    return glorot_uniform(jax.random.split(key, 1)[0], shape, dtype)


# --------------------------------------------------------------------------- the rules
def kp_feedback_grads(
    grads: list[dict[str, Array]], params: list[dict[str, Array]], feedback: Any,
    decay: float | Array,
) -> tuple[list[dict[str, Array]], list[Array]]:  # fmt: skip
    """Kolen-Pollack: ``(param_grads, feedback_grads)`` for one optimizer step.

    W^l's gradient becomes dW^l + λ W^l (every layer; biases unchanged) and B^l's
    (l = 2..L, paired with W^l) is dW^l + λ B^l: the same update and the same decay,
    so plain SGD with learning rate η gives W^l_t - B^l_t = (1 - ηλ)^t (W^l_0 - B^l_0).
    ``grads`` are the kp rule's own (``manual_grad(..., rule="kp")``).
    """
    feedback = list(feedback)
    want = [tuple(p["W"].shape) for p in params[1:]]
    if [tuple(getattr(B, "shape", ())) for B in feedback] != want:
        raise ConfigError(
            f"rule 'kp' needs feedback of one B^l shaped like W^l for l = 2..L, shapes {want}"
            f" (bpjax.init_feedback), got {[tuple(getattr(B, 'shape', ())) for B in feedback]}"
        )
    param_grads = [dict(g, W=g["W"] + decay * p["W"]) for g, p in zip(grads, params, strict=True)]
    feedback_grads = [g["W"] + decay * B for g, B in zip(grads[1:], feedback, strict=True)]
    return param_grads, feedback_grads


def _random_sign_concordant(W: Array, R: Array) -> Array:
    return jnp.abs(R) * jnp.sign(W)  # |R| ⊙ sign(W)


def _brsf_matrix(W: Array, state: Any, key: Array | None) -> Array:
    if key is None:
        raise ConfigError("rule 'brsf' draws its magnitudes from a per-step key: pass key=")
    return _random_sign_concordant(W, glorot_state(key, W.shape, W.dtype))


bp = Rule("bp", lambda W, state, key: W, about="backprop: (W^{l+1})^T")
fa = Rule("fa", lambda W, B, key: B, init=glorot_state, about="fixed random B")
kp = Rule("kp", lambda W, B, key: B, init=glorot_state, learn=kp_feedback_grads,
          about="B learns with W (Kolen-Pollack)")  # fmt: skip
dfa = Rule("dfa", lambda W, B, key: B, init=glorot_state, direct=True,
           about="output error straight to every hidden layer")  # fmt: skip
sign = Rule("sign", lambda W, state, key: jnp.sign(W), about="sign(W), unscaled")
usf = Rule("usf", lambda W, state, key: jnp.sign(W), scalable=True, about="sign(W)")
brsf = Rule("brsf", _brsf_matrix, needs_key=True, scalable=True,
            about="|R| sign(W), R redrawn every step")  # fmt: skip
frsf = Rule("frsf", lambda W, R, key: _random_sign_concordant(W, R), init=glorot_state,
            scalable=True, about="|R| sign(W), R drawn once")  # fmt: skip

BUILT_IN: tuple[Rule, ...] = (bp, fa, dfa, sign, kp, usf, brsf, frsf)
FEEDBACK_RULES = tuple(rule.name for rule in BUILT_IN)
_REGISTRY: dict[str, Rule] = {rule.name: rule for rule in BUILT_IN}


def register_rule(rule: Rule) -> Rule:
    """Makes ``rule`` known by its name in this process (``rule="name"``, ``--feedback=name``).

    A name already taken by another rule is refused; registering the same rule again
    is fine. A run started with a registered rule records only its name: to resume it
    in a new process, register it again first, or name it by import path instead.
    """
    if not isinstance(rule, Rule):
        raise ConfigError(f"register_rule takes a bpjax.Rule, got {type(rule).__name__}")
    if ":" in rule.name or not rule.name:
        raise ConfigError(f"a rule's name must be non-empty and without ':', got {rule.name!r}")
    known = _REGISTRY.get(rule.name)
    if known is not None and known != rule:
        raise ConfigError(f"a different rule is already registered as {rule.name!r}")
    _REGISTRY[rule.name] = rule
    return rule


def get_rule(spec: str | Rule, scale: bool = False) -> Rule:
    """The rule ``spec`` names: itself, a registered name, or an import path ``module:name``.

    ``scale``: its ``--feedback_scale`` form (``Rule.scaled``). One-line ConfigError
    (a ValueError) for a name that is not known or a path that does not import.
    """
    if isinstance(spec, Rule):
        rule = spec
    elif isinstance(spec, str) and ":" in spec:
        rule = import_rule(spec)
    elif isinstance(spec, str) and spec in _REGISTRY:
        rule = _REGISTRY[spec]
    else:
        raise ConfigError(
            f"unknown feedback rule {spec!r}: choose one of {', '.join(_REGISTRY)}, a rule"
            " registered with bpjax.register_rule, or an import path package.module:name"
        )
    return rule.scaled() if scale and not rule.scale else rule


# ----------------------------------------------------------------------- import paths
def _split_path(path: str) -> tuple[str, str]:
    module, _, attr = path.partition(":")
    if not module or not attr or ":" in attr:
        raise ConfigError(f"--feedback={path!r}: an import path is package.module:name")
    return module, attr


def import_rule(path: str) -> Rule:
    """The ``Rule`` at ``package.module:name``; a one-line ConfigError if it is not there."""
    module_name, attr = _split_path(path)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f"--feedback={path}: cannot import {module_name} ({first_line(e)}); is its"
            " directory on PYTHONPATH?"
        ) from None
    rule = getattr(module, attr, None)
    if not isinstance(rule, Rule):
        raise ConfigError(f"--feedback={path}: {module_name} has no bpjax.Rule named {attr!r}")
    return rule


def source_sha256(path: str) -> str:
    """SHA-256 of the source file of the module that ``package.module:name`` names."""
    module = importlib.import_module(_split_path(path)[0])
    with open(inspect.getsourcefile(module) or module.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def rule_record(spec: str) -> dict[str, Any] | None:
    """What ``config.json`` records of a rule named by import path (None for a name).

    ``{"name": the rule's own name, "path": spec, "sha256": of its module's source}``.
    """
    if ":" not in spec:
        return None
    return {"name": get_rule(spec).name, "path": spec, "sha256": source_sha256(spec)}


def check_recorded_rule(record: dict[str, Any] | None, spec: str, *, accept: bool,
                        accepted: Iterable[str] = ()) -> str | None:  # fmt: skip
    """Refuses (one line) a rule module whose source changed since the run recorded it.

    ``record``: config.json's ``feedback_rule``; ``accepted``: the hashes a resume
    already accepted (events). Returns the new hash when ``accept`` lets a change
    through (for the record), else None.
    """
    if not record or ":" not in spec or record.get("path") != spec:
        return None  # a built-in rule, or another rule than the one recorded
    now = source_sha256(spec)
    if now == record.get("sha256") or now in set(accepted):
        return None
    if accept:
        return now
    raise ConfigError(
        f"--feedback={spec}: the source of {_split_path(spec)[0]} changed since the run"
        f" recorded it (sha256 {str(record.get('sha256'))[:12]}..., now {now[:12]}...):"
        " restore it, or pass --accept_rule_change to go on with the new source deliberately"
    )


# ----------------------------------------------------------------------- per-step keys
def step_key(rule: Rule, key: Array | None) -> Array | None:
    """The rule's own key for this step, ``fold_in(key, RULE_KEY_STREAM)``; None unless needed.

    A rule that ignores the key gets None, so its compiled program consumes no key.
    """
    if not rule.needs_key:
        return None
    if key is None:
        raise ConfigError(f"rule {rule.name!r} needs a per-step PRNG key (key=)")
    return jax.random.fold_in(key, RULE_KEY_STREAM)


def layer_key(key: Array | None, l: int) -> Array | None:
    """Layer ``l``'s draw of a step key (None stays None)."""
    return None if key is None else jax.random.fold_in(key, l)


def optimizer_warning(rule: Rule, optimizer: str) -> str | None:
    """The one warning line for a learning rule under an optimizer other than plain SGD."""
    if rule.learn is None or optimizer == "sgd":
        return None
    return (
        f"warning: rule {rule.name}'s feedback learns with W; the Kolen-Pollack identity"
        f" W_t - B_t = (1 - lr λ)^t (W_0 - B_0) holds for plain SGD only, not"
        f" --optimizer={optimizer}"
    )
