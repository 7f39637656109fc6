"""maildetour.core"""
