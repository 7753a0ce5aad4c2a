"""ebmflow.training"""
