"""`draft-tune`: the vanilla MTP draft self-distilled on a chosen candidate body."""
