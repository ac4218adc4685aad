"""Layer implementations; importing this package fills the type registry."""
from .base import LAYER_TYPES, V1_TYPE_NAMES, Layer, register  # noqa: F401
from . import input  # noqa: F401,E402
from . import convolution  # noqa: F401,E402
from . import inner_product  # noqa: F401,E402
from . import flatten  # noqa: F401,E402
from . import pooling  # noqa: F401,E402
from . import relu  # noqa: F401,E402
from . import lrn  # noqa: F401,E402
from . import dropout  # noqa: F401,E402
from . import softmax  # noqa: F401,E402
from . import euclidean_loss  # noqa: F401,E402
from . import accuracy  # noqa: F401,E402
from . import data  # noqa: F401,E402
from . import class_select  # noqa: F401,E402
from . import python  # noqa: F401,E402
from . import hdf5_data  # noqa: F401,E402
