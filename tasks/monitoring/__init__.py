"""Monitoring: the request window, drift detectors, feedback and calibration, automatic responses,
alerting.
"""
