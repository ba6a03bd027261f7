"""Evaluation that only applies to medim-demo and the smoke data: the extractor of medim-demo's six
findings and the classifier of generated images (clinical.py), the reading probe and study, finding
visibility through a tokenizer, and the smoke job's rule scores. The metrics of evaluation/ itself
(report metrics, image metrics, CheXpert-14, memorisation, the page) apply to any dataset."""
