"""Neutral utilities used by every layer of revvit: plain Python and torch, no detectron2, no
pytorchvideo and nothing else of the project (see docs/architecture.md).

* :mod:`.io`: the one atomic write and the one checkpoint-file reader;
* :mod:`.seeding`: seeds derived from integer keys and scoped RNG states;
* :mod:`.errors`: the one-line rendering of an exception used by every tool;
* :mod:`.paths`: where built-in datasets are generated.
"""
