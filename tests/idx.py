import struct

import numpy as np


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file as torchvision reads it: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
