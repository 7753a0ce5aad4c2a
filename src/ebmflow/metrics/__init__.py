"""ebmflow.metrics"""
