"""Dataset generators (not retrieval stages): the mini-ILIAS, with emoji and real-photo object families."""
