"""Helpers below every other package of facetrain: any package may import ``common``, and
``common`` imports none of them."""
