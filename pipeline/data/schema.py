"""The on-disk contract between `ssod prepare` and every reader: Parquet row schema and file names.

One row is one image: its encoded bytes exactly as read (or re-encoded as RGB PNG when it had to be
converted) plus its cleaned annotations. Boxes are absolute-pixel XYXY; `labels` are contiguous model
labels 1..K (0 is background), mapped to COCO category ids by `categories.json`.
"""

import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image", pa.binary()),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        pa.field("labels", pa.list_(pa.int64())),
        # COCO segmentation of each annotation as JSON (polygon list or RLE dict); "" when it has none.
        pa.field("segmentations", pa.list_(pa.string())),
        # False for extra raw images that never had annotations.
        pa.field("annotated", pa.bool_()),
    ]
)

SPLIT_FILE = "split.json"
CATEGORIES_FILE = "categories.json"
REPORT_FILE = "prepare_report.json"
VAL_GT_FILE = "val_annotations.json"
UNLABELED_GT_FILE = "unlabeled_annotations.json"
LABELED_DIR = "labeled"
UNLABELED_DIR = "unlabeled"
VAL_DIR = "val"
