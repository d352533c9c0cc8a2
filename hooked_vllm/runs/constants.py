"""The datasets' names and prompts: facts the command line needs before anything heavy is imported."""

CAPTION_INSTRUCTION = "Describe the image in one sentence."
WINOGROUND_TEMPLATE = 'Does the caption "{caption}" describe the image?'
#: the datasets :func:`hooked_vllm.runs.datasets.load_dataset` reads
DATASETS = ("coco", "winoground", "samples")
#: datasets that read a data folder
READS_DATA_DIR = ("coco", "winoground")
