"""Data side shared by detection, attacks and validation: npz/image folders, shadow sets, triggers."""
from .images import (DataError, load_npz, load_image_folder, load_images, python_sample, resize_center_crop,
                     save_npz_dataset)
from .normalization import NORMALIZATION, CLIP_NORMALIZATION, EVALUATION_NORMALIZATION, normalize, to_model_input
from .shadow import (select_shadow, SHADOW_DEFAULTS, IMAGE_FOLDER_CAP, ShadowSet, default_shadow_path,
                     load_shadow_set)
from .triggers import (Trigger, load_trigger, save_trigger, white_square_trigger, stamp,
                       PAPER_TRIGGERS, legacy_trigger_tensors, write_paper_triggers)
from .reference import load_reference, save_reference, pick_reference
