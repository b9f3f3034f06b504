"""Raw product catalogues -> TFDS array_record datasets -> Grain batches."""
