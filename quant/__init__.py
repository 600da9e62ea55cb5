"""Static-shape ONNX export and QDQ post-training quantization. Not built yet: tracked by the quantization issue."""
