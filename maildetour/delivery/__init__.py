"""maildetour.delivery"""
