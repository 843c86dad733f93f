"""Core ML: conversion, package I/O, reading packages back, verification."""
