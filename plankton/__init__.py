"""The pipeline's library: everything the stage scripts share, one module per concept.
The stages themselves are plankton/registry.py's table; the scripts stay at the top level."""
