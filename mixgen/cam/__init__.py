"""The CAM toolkit: backbones (the embedded Lite0, timm, torchvision), the ONNX Runtime copy of a
backbone, CAM and SPM maths, the linear probe, and heat-map overlays. The pass that drives them
over a run's sources is ``mixgen.pipeline.campass``."""
