"""From a trial to a model: re-materialise a candidate bit for bit, export it with its model card."""
