"""Stage 2, bundling: what makes, checks or changes a bundle: export to ONNX, the bundle
format and its reader, graph composition, reduced-precision variants, TensorRT checks and
engines, and new task modules on a shipped trunk (add-task, transferability). The reader
(`bundle`) and composition (`fuse`, and `merge` of same-architecture task graphs) need only
numpy and onnx, for the runtime."""
