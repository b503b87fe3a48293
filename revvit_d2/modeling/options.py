"""The settings of the reversible engine, as one typed object.

The models take these settings as flat keyword arguments with the same names
(``RevViT(use_rev_backprop=False, rev_anchor_every=4)``) and keep them as one
:class:`EngineOptions` in ``model.engine``; the engine (:func:`~revvit_d2.modeling.reversible.
reversible_stack`) receives that object. Every builder (variants, video builders, yacs, LazyConfig)
exposes exactly these field names.
"""
import dataclasses

__all__ = ["EngineOptions"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How a stack of reversible blocks is run. The defaults are the memory-saving engine.

    Args:
        use_rev_backprop (bool): memory-saving reversible backward; False runs the same blocks
            under plain autograd (same arithmetic, same random draws).
        act_checkpoint (bool): with ``use_rev_backprop=False``, wrap each reversible block in
            ``torch.utils.checkpoint`` (the activation-checkpointing baseline of the memory
            benchmarks). Non-reversible layers (Rev-MViT's stage transitions) are not wrapped.
        parallel_backward (bool): PaReprop schedule of the reversible backward: on CUDA the
            recomputation of block i-1 (with the graph its gradient step uses) runs on a second
            stream while block i's gradients are computed; no extra F or G evaluation, same
            gradients, one block's graphs more memory. On a CPU it runs in order.
        rev_anchor_every (int): if > 0, store the two streams every this many blocks, so the
            inversion error cannot accumulate over more blocks; costs one stored pair per chunk.
        check_finite (bool): raise ``FloatingPointError`` naming the first block whose output is
            not finite (one device sync per block).
        compile_blocks (bool): ``torch.compile`` the F and G sub-blocks of every reversible block
            when the model is built (:func:`~revvit_d2.modeling.reversible.compile_subblocks`);
            the engine itself stays eager. Compiles lazily, on the first forward.
        stored_blocks (int): the memory-budget hybrid: the last ``k`` reversible blocks of the
            model keep their activations (ordinary autograd, no recomputation), the others use
            the reversible backward. 0 (default) is the fully reversible model; the model's
            number of reversible blocks is plain autograd.
            :func:`~revvit_d2.modeling.budget.choose_stored_blocks` picks ``k`` from a memory
            budget per image.
        rev_backward_chunk (int): if > 0, the reversible backward recomputes and
            back-propagates the batch in chunks of this many samples (parameter gradients are
            summed over the chunks), so its working set is that of one chunk, not of the batch.
            F and G must treat samples independently (true of every revvit block); active
            dropout inside F or G is refused (its mask cannot be replayed per chunk).
    """

    use_rev_backprop: bool = True
    act_checkpoint: bool = False
    parallel_backward: bool = False
    rev_anchor_every: int = 0
    check_finite: bool = False
    compile_blocks: bool = False
    stored_blocks: int = 0
    rev_backward_chunk: int = 0

    def __post_init__(self):
        for name in ("rev_anchor_every", "stored_blocks", "rev_backward_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @classmethod
    def names(cls):
        """The option names, in declaration order (the keyword arguments every builder takes)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "EngineOptions":
        """A copy with some options changed (the object itself is frozen)."""
        return dataclasses.replace(self, **changes)
