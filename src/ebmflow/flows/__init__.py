"""ebmflow.flows"""
