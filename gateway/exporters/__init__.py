"""Recorder-bus subscribers that send spans elsewhere: OTLP to the user's tracing backend."""

from gateway.exporters.otlp import ExportCollector, OtlpExporter

__all__ = ["ExportCollector", "OtlpExporter"]
