"""maildetour.sign"""
