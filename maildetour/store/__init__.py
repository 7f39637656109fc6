"""maildetour.store"""
