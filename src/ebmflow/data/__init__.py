"""ebmflow.data"""
