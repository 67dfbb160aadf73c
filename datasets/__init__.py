"""Data side shared by detection, attacks and validation: npz/image folders, shadow sets, triggers."""
from .images import DataError, load_npz, load_image_folder, load_images, resize_center_crop, save_npz_dataset
from .normalization import NORMALIZATION, CLIP_NORMALIZATION, normalize, to_model_input
from .shadow import select_shadow, SHADOW_DEFAULTS, default_shadow_path
from .triggers import (Trigger, load_trigger, save_trigger, white_square_trigger, stamp,
                       PAPER_TRIGGERS, legacy_trigger_tensors, write_paper_triggers)
from .reference import load_reference, save_reference, pick_reference
