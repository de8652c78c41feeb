"""Files and object stores: atomic writes (atomic), object-store prefixes to and from local
directories (fetch), and safetensors headers checked against config.json (weights_check).
"""
