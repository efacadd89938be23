"""``python -m onnx_slice ...`` is the ``onnx-slice`` command."""

from ._cli import main

main()
