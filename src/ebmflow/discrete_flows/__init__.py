"""ebmflow.discrete_flows"""
