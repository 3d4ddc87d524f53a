"""Baking schedules into ONNX / TensorRT engines. Not built yet: see issue 7."""
