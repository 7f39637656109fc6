"""maildetour.pop3"""
