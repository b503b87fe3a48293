"""Compatibility of pytorchvideo 0.1.5 (2022) with current torchvision.

``pytorchvideo.transforms`` imports ``torchvision.transforms.functional_tensor``, a private module
that torchvision 0.17 renamed to ``torchvision.transforms._functional_tensor`` (pytorchvideo
issues #258, #261, #269, #271). Importing ``pytorchvideo.transforms`` therefore fails with
``ModuleNotFoundError`` on any recent torchvision.

:func:`install_functional_tensor_alias` registers the renamed module under its old name in
``sys.modules``, *only if the old import fails*, so that the unmodified pytorchvideo imports; on an
old torchvision (or a fixed pytorchvideo) it does nothing. pytorchvideo uses only ``affine`` from
that module (in its AugMix / RandAugment ops), which ``_functional_tensor`` still provides with the
same signature. :func:`import_pytorchvideo_transforms` installs the alias and returns the module;
``revvit_video.transforms`` goes through it.
"""
import importlib
import logging
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

__all__ = ["install_functional_tensor_alias", "import_pytorchvideo_transforms"]

_OLD_NAME = "torchvision.transforms.functional_tensor"
_NEW_NAME = "torchvision.transforms._functional_tensor"


def install_functional_tensor_alias() -> bool:
    """Make ``import torchvision.transforms.functional_tensor`` work on torchvision >= 0.17.

    Returns:
        True if the alias was installed by this call, False if it was not needed (the original
        module imports, or the alias is already installed).

    Raises:
        ImportError: neither the old nor the new module exists (an unknown torchvision).
    """
    if _OLD_NAME in sys.modules:
        return False
    try:
        importlib.import_module(_OLD_NAME)
        return False  # an old torchvision: nothing to do
    except ImportError:
        pass
    try:
        module: ModuleType = importlib.import_module(_NEW_NAME)
    except ImportError as e:
        raise ImportError(f"neither {_OLD_NAME} nor {_NEW_NAME} can be imported; this "
                          f"torchvision is not supported by pytorchvideo.transforms") from e
    sys.modules[_OLD_NAME] = module
    # ``import a.b.c as x`` resolves the attribute on the parent package too.
    import torchvision.transforms as tv_transforms

    if not hasattr(tv_transforms, "functional_tensor"):
        tv_transforms.functional_tensor = module
    logger.debug("aliased %s -> %s for pytorchvideo.transforms", _OLD_NAME, _NEW_NAME)
    return True


def import_pytorchvideo_transforms() -> ModuleType:
    """``import pytorchvideo.transforms``, installing the alias first when it is needed."""
    install_functional_tensor_alias()
    return importlib.import_module("pytorchvideo.transforms")
