"""Several schemes behind one program: ``SchemeSwitch`` picks a scheme by a traced index (``lax.switch``), so the
KD step of every scheme in it compiles to one and the same XLA program, and runs that differ only in their scheme
(a sweep's aug axis, the demo) read it from the persistent compilation cache instead of compiling their own.

Each branch is the scheme's own function on the same key, so x' (and its label targets) are the values the scheme
alone gives. The switch holds the schemes that need no model: x' is a function of x and the key alone, so the
program around the switch is the scheme's own program with x' read from the branch. The two CutMixPick schemes
keep programs of their own: the student-scored one runs inside the student's loss, and the teacher-scored one's
pool pass, moved into a branch, changes how XLA fuses the teacher's other pass (its BatchNorm constants are no
longer shared), which moved the teacher's logits by about 1e-6 on a trained teacher (measured on CPU).
"""
import dataclasses
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from kdjax.augment import transforms
from kdjax.augment.registry import PAPER_SCHEMES, Scheme, scorer_of

# The schemes a switch holds: the paper's schemes that no model scores. A fixed list, not the runs' own schemes, so
# that every run of one of them traces the very same program.
SWITCHABLE = tuple(name for name in PAPER_SCHEMES if scorer_of(name) is None)


@dataclasses.dataclass(frozen=True)
class SchemeSwitch:
    """The schemes of ``SWITCHABLE`` (``schemes``, in its order, each created with the run's options) and the run's
    own, ``name``, whose position the step reads as data (``index``)."""
    schemes: Tuple[Scheme, ...]
    name: str
    scored_by = None  # no branch runs a model (the step reads it as it reads a scheme's)

    @property
    def index(self) -> int:
        return SWITCHABLE.index(self.name)

    def __call__(self, index, key, images, labels, num_classes: int):
        """x' of the scheme at ``index`` and its aux, ``{'targets': [rows, C]}``: the soft label targets of
        ``transforms.mixed_targets`` (the branches' own aux differ in structure; a step reads only these of them)."""
        def branch(scheme):
            def run(key, images, labels):
                out, aux = scheme(key, images, labels)
                return out, {"targets": transforms.mixed_targets(aux, labels, num_classes, out.shape[0])}
            return run
        return jax.lax.switch(jnp.asarray(index, jnp.int32), [branch(s) for s in self.schemes], key, images, labels)


def make_switch(create: Callable[[str], Scheme], name: str) -> Optional[SchemeSwitch]:
    """The switch over ``SWITCHABLE`` (each scheme built by ``create(name)``) that runs ``name``, or None when
    ``name`` is not one of them."""
    if name not in SWITCHABLE:
        return None
    return SchemeSwitch(tuple(create(n) for n in SWITCHABLE), name)
