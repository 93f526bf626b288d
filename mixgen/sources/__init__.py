"""Stage 1, the sources: scanning SRC (image folders, CUB, index files) into one ``SourceIndex`` and
decoding a source into its S×S view. Nothing here knows about OUT or the CAM."""
