"""The sharding layer of smap: meshes, state placement and SPMD mapping functions."""
