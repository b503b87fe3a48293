"""What Rev-ViT and Rev-MViT share: the engine options and the classification head.

Both models end the same way (official order: LayerNorm over the 2C concatenation of the two
streams, then fusion, then the token mean)::

    tokens (B, N, 2C) ─ LN(2C) ─ fuse ─ mean over tokens ─ dropout ─ Linear ─ logits
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import TwoStreamFusion, init_official_weights
from .options import EngineOptions
from .reversible import ReversibleBlock, compile_subblocks, reversible_stack

__all__ = ["RevModelBase"]


class RevModelBase(nn.Module):
    """Base of :class:`~revvit_d2.modeling.RevViT` and :class:`~revvit_d2.modeling.RevMViT`.

    ``self.engine`` holds the :class:`EngineOptions` built from the constructor's flat keyword
    arguments. Each option can also be read and (except ``compile_blocks``, which acts at
    construction) set as a model attribute: ``model.use_rev_backprop = False`` replaces
    ``model.engine`` by a copy with that option changed.
    """

    engine: EngineOptions

    def _build_head(self, width: int, fuse: str, dropout_rate: float, head_dropout_rate: float,
                    num_classes: int):
        """The stack-output dropout, fusion, final norm and classifier for streams of width C."""
        self.num_classes = num_classes
        self.stack_drop = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.fuse = TwoStreamFusion(fuse, 2 * width)
        self.num_features = width if self.fuse.halves_width else 2 * width
        # a fusion before the norm (converted plain ViTs) leaves one stream's width to normalise
        self.norm = nn.LayerNorm(width if self.fuse.before_norm else 2 * width, eps=1e-6)
        self.head_drop = nn.Dropout(head_dropout_rate) if head_dropout_rate > 0 else nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _finish_init(self):
        """Official initialisation of every submodule, then the optional compilation."""
        self.apply(init_official_weights)
        self._stored_in([])  # validates stored_blocks against the model's depth
        if self.engine.compile_blocks:  # the reversible blocks' F and G only
            compile_subblocks(self)

    def _run(self, blocks, x1: torch.Tensor, x2: torch.Tensor, thw: Sequence[int],
             names: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A run of reversible blocks through the engine, with this model's options."""
        # The patch embedding's tokens are a transposed view: without one copy here every
        # LayerNorm in the stack would copy them and every residual add would write strided
        # memory (the streams take the layout of their first input).
        if x1 is x2:
            x1 = x2 = x1.contiguous()
        else:
            x1, x2 = x1.contiguous(), x2.contiguous()
        options = self.engine
        if options.stored_blocks:
            options = options.replace(stored_blocks=self._stored_in(blocks))
        return reversible_stack(blocks, x1, x2, thw, options, names)

    def reversible_blocks(self):
        """The model's reversible blocks in forward order (Rev-MViT's transitions excluded)."""
        return [m for m in self.blocks if isinstance(m, ReversibleBlock)]

    def _stored_in(self, run) -> int:
        """How many blocks of ``run`` are among the model's last ``stored_blocks`` reversible
        blocks (they always form the end of the run)."""
        every = self.reversible_blocks()
        k = self.engine.stored_blocks
        if k > len(every):
            raise ValueError(f"stored_blocks={k} exceeds the model's {len(every)} reversible "
                             f"blocks")
        stored = {id(b) for b in every[len(every) - k:]}
        return sum(id(b) in stored for b in run)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, 2C) -> logits (B, classes) (or pooled features if num_classes == 0)."""
        x = self.fuse_and_norm(tokens).mean(dim=1)  # (B, num_features)
        return self.head(self.head_drop(x))


    def fuse_and_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, 2C) -> (B, N, num_features): the final norm and the stream fusion, in
        the order the fusion asks for (official: norm first)."""
        if self.fuse.before_norm:
            return self.norm(self.fuse(tokens))
        return self.fuse(self.norm(tokens))


def _option_property(name: str, settable: bool) -> property:
    def get(self):
        return getattr(self.engine, name)

    def set(self, value):
        self.engine = self.engine.replace(**{name: value})

    return property(get, set if settable else None, doc=f"``self.engine.{name}``")


for _name in EngineOptions.names():
    setattr(RevModelBase, _name, _option_property(_name, settable=_name != "compile_blocks"))
