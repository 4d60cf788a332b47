"""The offline demo's parts (configs/demo.py): conversations written for it (data.py), a tiny scorer
trained on them (scorer.py) and the brief pre-training of a random-init base (pretrain.py)."""
