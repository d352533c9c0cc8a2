"""The activation store's choices: facts the command line needs before anything heavy is imported."""

#: which rows of an item to store
POSITIONS = ("image", "text", "last", "all")
#: dtypes the stored vectors may have
STORAGE_DTYPES = ("float32", "float16", "float64")
