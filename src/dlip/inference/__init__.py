"""The deploy half of dlip: what serves a trained model.

- `predictor.py`: `Predictor` (caption, embed, ITM, search) over every input type, `BadImage`.
- `index.py`: `ImageIndex` and `build_index` (resumable on-disk image embeddings).
- `serve.py`: `dlip serve`, the web app and its JSON API.
- `onnx.py`: `dlip export onnx`, graphs checked against PyTorch in onnxruntime; int8 copies.
- `ort.py`: ONNX Runtime as a Predictor backend (`Predictor.load(onnx_dir)`).
"""

from dlip.inference.index import ImageIndex, build_index
from dlip.inference.predictor import BadImage, Predictor

__all__ = ["BadImage", "ImageIndex", "Predictor", "build_index"]
