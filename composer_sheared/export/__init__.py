"""HF exports of a run: the whole model out of a Composer State (gather), a pruning checkpoint as
a sliced HF directory (sliced), and the model card and provenance.json of every output (model_card).
"""
