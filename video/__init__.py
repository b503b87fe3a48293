"""revvit_video: the PyTorchVideo wrapping of the reversible backbones.

Installed from the folder ``video/`` under the import name ``revvit_video`` (see setup.py) so
that it cannot shadow another package called ``video``. The builders, hub entry points and the
Kinetics data pipeline are tracked in the PyTorchVideo issue and are not implemented yet.
"""
