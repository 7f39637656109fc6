"""maildetour.inbound"""
