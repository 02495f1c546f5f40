"""The contract between manifests, operator and relay.

- schema.py: the one definition of the resources, and the one owner of their
  defaults and string enums (CRDs are generated from it: crdgen.py)
- validate.py, load.py: offline checks and structural defaulting
- spec.py: the defaulted specs as typed, frozen dataclasses
- render.py, shards.py: manifests -> the relay's configuration files
- units.py: durations as the manifests write them
- drain_protocol.py: the signed drain requests of the operator to the relay pods
- pod_env.py: the environment the operator sets in relay pods for the relay
"""
