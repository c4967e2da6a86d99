"""Vision-language inputs: images and videos preprocessed into the pixel tensors a vision tower
takes, placeholder token counts, video decoding (PyAV) and content hashes for the caches."""

from tidal.multimodal.hashing import content_hash
from tidal.multimodal.processing import (CLIPImageProcessor, ImageProcessor, ProcessedImages, ProcessedVideo,
                                         Qwen2VLImageProcessor, SiglipImageProcessor, decode_image,
                                         smart_resize)
from tidal.multimodal.video import load_video

__all__ = ["CLIPImageProcessor", "ImageProcessor", "ProcessedImages", "ProcessedVideo", "Qwen2VLImageProcessor",
           "SiglipImageProcessor", "content_hash", "decode_image", "load_video", "smart_resize"]
