"""Video in, video out, and edit masks."""

from .masks import boxes_to_mask, crop_mask, is_still_image, load_mask, read_boxes, read_mask
from .video import (
    check_output_path,
    check_report_path,
    count_frames,
    plan_crop,
    read_frames,
    read_video,
    resize_crop,
    side_by_side,
    write_video,
)

__all__ = ["boxes_to_mask", "crop_mask", "is_still_image", "load_mask", "read_boxes", "read_mask", "check_output_path",
           "check_report_path", "count_frames", "plan_crop", "read_frames", "read_video", "resize_crop", "side_by_side",
           "write_video"]
