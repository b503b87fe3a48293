#!/usr/bin/env python
"""Convert an official Rev-ViT / Rev-MViT checkpoint, or a sharded one, to one revvit file.

Reads a SlowFast ``.pyth`` (``{"model_state": ...}``) or an mmpretrain ``.pth``
(``{"state_dict": ...}``), prints the key mapping, optionally checks that the result loads
strictly into a named revvit model, and writes ``{"model": state_dict, "source": ...}``
atomically. The source may also be a sharded checkpoint directory written by a training tool
with ``train.fsdp.enabled=True`` (torch.distributed.checkpoint, any number of processes): the
output then holds its full model tensors (no optimizer or trainer state), which
``--eval-only`` (``train.init_checkpoint=OUT``) and the model loaders read (docs/fsdp_training.md).

Examples:
    python tools/convert_checkpoint.py REV_VIT_B.pyth rev_vit_b.pth --model rev_vit_b
    python tools/convert_checkpoint.py output/run/model_final model_final.pth

Expected errors (a missing or unreadable input, a checkpoint that does not fit ``--model``)
print one ``error:`` line on stderr and exit with status 1 without writing anything.

The input is read as data only: a file whose pickle needs more is refused;
``--allow-unsafe-pickle`` loads it anyway, which executes code from the file: only for files
you trust (docs/security.md). The output holds only tensors and strings.
"""
import argparse
import logging
import os
import sys

import revvit_d2
from revvit_d2.checkpoint import describe_mapping, detect_format
from revvit_d2.vit_import import PLAIN_VIT_FORMATS
from revvit_d2.utils.errors import EXIT_ERROR, UserError, one_line, print_error
from revvit_d2.utils.io import atomic_torch_save, read_checkpoint
from revvit_d2.utils.sharded_checkpoint import read_sharded_tensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="official checkpoint (.pyth / .pth), or a sharded checkpoint "
                                  "directory of a train.fsdp run")
    p.add_argument("output", help="where to write the converted checkpoint")
    p.add_argument("--format", default="auto",
                   choices=["auto", "slowfast", "mmpretrain", *PLAIN_VIT_FORMATS],
                   help="input format (default: detected from the keys)")
    p.add_argument("--model", default=None,
                   help=f"verify a strict load into this model ({', '.join(revvit_d2.list_models())})")
    p.add_argument("--quiet", action="store_true", help="do not print the key mapping")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="load an input whose pickle needs more than data: executes code from "
                        "the file; only for files you trust")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.path.isdir(args.source):
        return convert_sharded(args)
    try:
        ckpt = read_checkpoint(args.source, allow_unsafe_pickle=args.allow_unsafe_pickle)
    except UserError as e:  # refused: its pickle asks for more than data
        print_error(e)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - empty, truncated or not a checkpoint at all
        print_error(UserError(f"cannot read checkpoint {args.source}: {one_line(e)}"))
        return EXIT_ERROR
    try:
        fmt = detect_format(ckpt) if args.format == "auto" else args.format
        sd = revvit_d2.convert_state_dict(ckpt, fmt)
        if not args.quiet:
            print(f"format: {fmt}")
            print("\n".join(describe_mapping(ckpt, fmt)))
        if args.model:
            model = revvit_d2.create_model(args.model)
            revvit_d2.load_pretrained(model, sd, fmt="revvit")
            print(f"verified: loads strictly into {args.model}")
    except (KeyError, ValueError, revvit_d2.CheckpointMismatchError) as e:
        print_error(UserError(str(e)))
        return EXIT_ERROR
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # atomic: never a half-written output file
    atomic_torch_save({"model": sd, "source": os.path.basename(args.source), "format": fmt},
                      args.output)
    print(f"wrote {len(sd)} tensors to {args.output}")
    return 0


def convert_sharded(args) -> int:
    """A sharded (DCP) checkpoint directory -> one file of its full model tensors."""
    try:
        sd = read_sharded_tensors(args.source, "model.", args.allow_unsafe_pickle)
    except UserError as e:  # refused: its metadata pickle asks for more than data
        print_error(e)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - not a DCP directory, incomplete, damaged
        print_error(UserError(f"cannot read sharded checkpoint {args.source}: {one_line(e)}"))
        return EXIT_ERROR
    if not args.quiet:
        print(f"format: sharded (torch.distributed.checkpoint), {len(sd)} model tensors")
    if args.model:
        try:
            revvit_d2.load_pretrained(revvit_d2.create_model(args.model), sd, fmt="revvit")
        except (KeyError, ValueError, revvit_d2.CheckpointMismatchError) as e:
            print_error(UserError(str(e)))
            return EXIT_ERROR
        print(f"verified: loads strictly into {args.model}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    source = os.path.basename(os.path.normpath(args.source))
    atomic_torch_save({"model": sd, "source": source, "format": "revvit"}, args.output)
    print(f"wrote {len(sd)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
